"""Run the ctharden Prefect flows (entry point; the flows live in :mod:`ctharden.flows.pipeline`).

    python flows/pipeline.py                      # the whole pipeline on the embedded default data
    python flows/pipeline.py --profile smoke --only data
"""

from ctharden.flows.pipeline import *  # noqa: F401,F403 - deployments reference flows/pipeline.py:<flow>
from ctharden.flows.pipeline import main

if __name__ == "__main__":
    main()
