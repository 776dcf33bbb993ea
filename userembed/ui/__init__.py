"""`userembed ui`: a small read-only web page over what the platform already holds.

    data.py        reads the registry, the vector store, the transfer results (plain records)
    projection.py  a 2-D PCA of a sample of users' vectors, with a profile attribute each
    plots.py       matplotlib figures as PNG bytes
    pages.py       server-rendered HTML (no JavaScript)
    server.py      the stdlib HTTP server: routes, plot cache, `serve(config, sources)`

Like userembed.status, this package imports neither the trainer, the refresh job nor gRPC: the
caller (userembed.commands.ui) passes what only it may read (a refresh's record of a version,
a recompute through the server, the pipeline status) in as callables (`data.UiSources`).
"""
