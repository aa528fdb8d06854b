"""deploy: cluster descriptions, the local launcher (deploy.local), service registry, test helpers."""
