"""`mlflow run . -e doctor`: what this machine offers a profile; non-zero when a need is missing."""

from mstl.stages.doctor import main

if __name__ == "__main__":
    main()
