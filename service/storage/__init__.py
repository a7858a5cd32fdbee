"""Redis: the connection and its one error boundary, the snapshot store the service reads and
writes, and the watcher that follows the active snapshot."""
