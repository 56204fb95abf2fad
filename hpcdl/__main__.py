from hpcdl.cli import main

raise SystemExit(main())
