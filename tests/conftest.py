import sys
from pathlib import Path

# tests/faults/ imports the launch helpers that live beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
