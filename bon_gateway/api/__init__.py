"""The client-facing fronts over one Engine: the OpenAI-compatible HTTP app
(`http_app.build_app`), the BestOfN gRPC servicer (`grpc_service`), and the
process that serves both (`server.serve_gateway`, `server.run_gateway`).

Nothing is imported here so that `import bon_gateway.api.<module>` stays cheap.
"""
