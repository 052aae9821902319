"""Policy routing: the kernel's rules and tables in the fast path."""
