from services.proxy.app import create_app
from services.proxy.config import ProxySettings
from shared.service import serve

serve(ProxySettings, create_app)
