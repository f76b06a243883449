-- comfyfarm creates its own databases: the control database `comfyfarm` and one
-- `comfyfarm_<frontend>` per frontend. Its user may do anything there, and
-- nothing anywhere else. (The MariaDB image creates MARIADB_USER at first start;
-- this file runs right after.)
GRANT ALL PRIVILEGES ON `comfyfarm`.* TO 'comfyfarm'@'%';
GRANT ALL PRIVILEGES ON `comfyfarm\_%`.* TO 'comfyfarm'@'%';
