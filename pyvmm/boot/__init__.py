"""Boot code: guest memory layout, kernel loaders, tables and CPU setup."""
