from services.credits.app import create_app
from services.credits.config import CreditsSettings
from shared.service import serve

serve(CreditsSettings, create_app)
