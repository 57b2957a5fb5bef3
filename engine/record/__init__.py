"""Files hierui writes and reads, as data: paths, locks, settings, schema, validation, session files."""
