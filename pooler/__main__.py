from pooler.cli import main

raise SystemExit(main())
