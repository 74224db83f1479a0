"""Screenshots of `laps serve` for the README: the results grid of a query and the explanation of its first result.

    python .ci/serve_screenshots.py INDEX --query "a small red circle left of a blue square" --out nbs/images

Serves INDEX on a free loopback port (laps.retrieval.load_bench.serving), drives the system's headless Chromium
(Debian's chromium and chromium-driver) through Selenium, and writes laps-serve-search.png and laps-serve-explain.png.
"""
import argparse, sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('index'); p.add_argument('--query', required=True); p.add_argument('--out', default='nbs/images')
    p.add_argument('-k', type=int, default=8); p.add_argument('--result', type=int, default=1, help='which result to explain')
    a = p.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from laps.retrieval.load_bench import serving
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions(); opts.binary_location = '/usr/bin/chromium'
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--window-size=1280,1000'):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service('/usr/bin/chromedriver'), options=opts)
    try:
        with serving(a.index, '-k', str(a.k)) as (url, _, info):
            wait = WebDriverWait(driver, 300)
            driver.get(url + '/')
            wait.until(lambda d: 'images' in d.find_element(By.ID, 'info').text)
            driver.find_element(By.ID, 'q').send_keys(a.query)
            driver.find_element(By.ID, 'go').click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#grid figure.hit')) == a.k)
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
            driver.save_screenshot(str(out / 'laps-serve-search.png'))
            driver.find_elements(By.CSS_SELECTOR, '#grid figure.hit')[a.result - 1].click()
            wait.until(lambda d: d.execute_script(
                "const i = document.getElementById('ex-png'); return i.complete && i.naturalWidth > 100"))
            driver.save_screenshot(str(out / 'laps-serve-explain.png'))
            print(f"{out / 'laps-serve-search.png'}, {out / 'laps-serve-explain.png'}: {info}")
    finally: driver.quit()
    return 0


if __name__ == '__main__':
    sys.exit(main())
