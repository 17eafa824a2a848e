from jobqd.cli import main

raise SystemExit(main())
