"""One module per subcommand; each has ``register(app)`` and imports heavy things lazily."""
