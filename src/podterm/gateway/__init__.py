"""The gateway: HTTP/WebSocket front end, REST API, attach relay, admin endpoints.

``podterm.gateway.server`` holds the task tree and the entry points
(:func:`~podterm.gateway.server.serve`, :func:`~podterm.gateway.server.main`).
"""
