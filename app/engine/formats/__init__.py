"""Safe loaders: .pt2 archives (pt2), ONNX (onnx_safe), the sandboxed inspector (sandbox) and
data files (data).

Deliberately empty of imports: ``formats.sandbox`` must stay importable by the service without
pulling torch into the web process (the child process does the heavy imports).
"""
