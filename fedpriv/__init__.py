"""The ``fedpriv`` command: ``cli`` parses and dispatches to one ``cmd_*`` module per subcommand; no logic
lives here. The one package that may import all the others; nothing imports it."""

__all__ = ["cli"]
