from unionfs.command import main

raise SystemExit(main())
