"""What people look at rather than read: plots (``plots``), the pictures and tables a training
run and a registered version carry in MLflow (``pictures``), one offline HTML page per training
run (``run_report``), and the small HTML toolkit the offline pages share (``html_page``)."""
