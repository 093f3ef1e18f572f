"""One module per DVC stage: params + cache inputs -> cache outputs, by calling the library."""
