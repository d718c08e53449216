"""Runtime: errors, durable files, the run config, collectives, random streams, graceful stops."""
