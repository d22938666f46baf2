from herder.cli import main

raise SystemExit(main())
