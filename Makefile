# The two commands of the README quick start. Both set everything up on a fresh machine first.
.PHONY: demo test lint setup

demo:
	./deploy/setup.sh sim,edge,cloud
	.venv/bin/shelfloop demo

test:
	./deploy/setup.sh sim,edge,intel,cloud,train,dev
	.venv/bin/ruff check .
	.venv/bin/pytest

lint:
	.venv/bin/ruff check .

setup:
	./deploy/setup.sh sim,edge,intel,cloud,train,dev
