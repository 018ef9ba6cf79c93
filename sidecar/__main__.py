from broker.config import exit_now
from sidecar.cli import main

exit_now(main())
