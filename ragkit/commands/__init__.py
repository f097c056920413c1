"""One thin module per subcommand: parse flags, call the library, print. No algorithms here."""
