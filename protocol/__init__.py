"""The router <-> worker wire protocol: message structs, codec, error kinds. No I/O."""
