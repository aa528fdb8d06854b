"""haiplatform: HAI-Platform (job API and database, scheduler, node agents, the ``hai`` CLI)."""
