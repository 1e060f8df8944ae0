from .cli import main

# Guarded: worker processes are spawned, and spawning imports the parent's main module again.
if __name__ == "__main__":
    raise SystemExit(main())
