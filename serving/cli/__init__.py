"""The command line: `promptmux` and its subcommands, serve and local serve, training and the prompt-science commands."""
