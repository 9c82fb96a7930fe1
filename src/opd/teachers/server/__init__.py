"""The teacher server (`opd serve`): the HTTP app, its request batcher and the wire protocol
it shares with `opd.teachers.remote`."""
