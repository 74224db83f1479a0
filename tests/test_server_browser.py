"""The search page of `laps serve` in a real headless Chromium (Selenium, the system's chromium and chromedriver):
type a query, wait for the grid, open a result's explanation and check what it shows, search the captions with an
uploaded image, and see an over-long query's error on the page. LAPS_SCREENSHOTS=DIR saves screenshots of both views."""
import os, shutil, time
from pathlib import Path
import pytest
from index_world import make_world, build_world_index

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
DRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'


@pytest.fixture(scope='module')
def browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not Path(p).is_file()]
    if missing: pytest.skip(f"no {' and no '.join(missing)}: install the system's chromium and chromium-driver packages")
    pytest.importorskip('fastapi', reason="the serve extra (pip install 'laps[serve]') is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--window-size=1280,1000'):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope='module')
def served(tmp_path_factory, synthetic_data):
    from laps.retrieval.load_bench import serving
    world = make_world(tmp_path_factory.mktemp('browser'), synthetic_data)
    with serving(build_world_index(world, world['root'] / 'idx'), '-k', '6') as (url, proc, info):
        yield url, world


def _shot(driver, name):
    if os.environ.get('LAPS_SCREENSHOTS'):
        Path(os.environ['LAPS_SCREENSHOTS']).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(os.environ['LAPS_SCREENSHOTS']) / name))


def test_search_explain_upload_and_errors_in_a_real_browser(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, world = served
    d, wait = browser, WebDriverWait(browser, 120)
    d.get(url + '/')
    wait.until(lambda d: 'images' in d.find_element(By.ID, 'info').text)
    assert d.find_element(By.ID, 'info').text.startswith('12 images, 60 captions')
    assert d.execute_script("return document.getElementById('k').value") == '6'          # the server's -k
    box = d.find_element(By.ID, 'q')
    box.send_keys('a small red circle left of a blue square')
    d.find_element(By.ID, 'go').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#grid figure.hit')) == 6)
    wait.until(lambda d: d.execute_script("return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
    timing = d.find_element(By.ID, 'timing').text
    assert '6 images' in timing and 'shortlist' in timing and 're-rank' in timing, timing
    first = d.find_element(By.CSS_SELECTOR, '#grid figure.hit')
    assert first.text.startswith('#1') and 'shortlist' in first.text
    _shot(d, 'laps-serve-search.png')
    first.click()
    wait.until(lambda d: d.find_element(By.ID, 'explain').is_displayed())
    wait.until(lambda d: d.execute_script("const i = document.getElementById('ex-png'); return i.complete && i.naturalWidth > 100"))
    numbers = d.find_element(By.ID, 'ex-numbers').text
    assert 'similarity' in numbers and 'kept patches' in numbers and 'per-word contributions' in numbers, numbers
    assert 'a small red circle left of a blue square' in d.find_element(By.ID, 'ex-title').text
    assert not d.find_element(By.ID, 'grid').is_displayed()
    _shot(d, 'laps-serve-explain.png')
    d.find_element(By.ID, 'back').click()
    assert d.find_element(By.ID, 'grid').is_displayed()
    d.find_element(By.ID, 'file').send_keys(str(sorted((world['data'] / 'synthetic' / 'images').glob('*.png'))[0]))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#captions li')) == 6)
    d.find_elements(By.CSS_SELECTOR, '#captions li')[0].click()
    wait.until(lambda d: d.execute_script("const i = document.getElementById('ex-png'); return i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 100"))
    assert 'your image' in d.find_element(By.ID, 'ex-title').text
    box.clear(); box.send_keys('x' * 600); d.find_element(By.ID, 'go').click()
    wait.until(lambda d: d.find_element(By.ID, 'error').is_displayed())
    assert d.find_element(By.ID, 'error').text == 'q is 600 characters long; at most 500 are accepted'
    assert not d.find_element(By.ID, 'busy').is_displayed()
    origins = d.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {url}, origins                              # nothing fetched from elsewhere
