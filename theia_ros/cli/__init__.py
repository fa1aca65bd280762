"""The `theia-ros` command line: one module per verb group (see main.SUBCOMMAND_MODULES)."""
