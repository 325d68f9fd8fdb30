{
  "targets": [
    {
      "target_name": "snapctl_lz4",
      "sources": ["snapctl_lz4.c", "writev.c"],
      "libraries": ["-llz4", "-lz"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
