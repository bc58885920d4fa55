from xenblk.cli import main

raise SystemExit(main())
