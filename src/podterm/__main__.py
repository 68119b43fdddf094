from podterm.cli import main

raise SystemExit(main())
