"""The ``paca`` command line: one module per subcommand."""
