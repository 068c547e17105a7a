"""The served model as MLflow "models from code": loading a registered model runs this file (with
the mstl package logged beside it) instead of unpickling a Python object."""

from mlflow.models import set_model

from mstl.inference.pyfunc import CTClassifier

set_model(CTClassifier())
