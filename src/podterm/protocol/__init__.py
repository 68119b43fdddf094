"""Sans-IO protocol core: bytes in, events out.  Imports nothing from trio or sockets."""
