from prefkit.cli import entrypoint

entrypoint()
