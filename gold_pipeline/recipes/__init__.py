"""Things built on the library rather than part of it: the offline demo, its report, and `gold inspect`."""
