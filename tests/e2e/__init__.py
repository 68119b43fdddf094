"""End-to-end tests: real gateway processes, real clients (CLI in tmux, browsers)."""
