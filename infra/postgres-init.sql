-- One server, three databases: fp4roll's store, MLflow's backend store, Prefect's API database.
CREATE DATABASE mlflow OWNER fp4roll;
CREATE DATABASE prefect OWNER fp4roll;
