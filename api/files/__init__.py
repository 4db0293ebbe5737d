"""/v1/files: upload, list, read and delete the files batches read."""
