"""The Textual explorer: the app, where its steps come from, its messages and panels."""
