/* Replays fuzz inputs through a libFuzzer target without libFuzzer, so that the committed corpus
 * runs as regression tests with any C compiler (gcc + ASan/UBSan in `make fuzz-regress` and
 * tests/test_fuzz_regress.py).
 *
 * Usage: replay_<target> PATH...   (a PATH is a file or a directory of files, not recursive)
 * Every input is run once; an invariant violation aborts with the case printed (see
 * fuzz_common.h), a sanitizer error aborts too. Prints the number of inputs run.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "replay: cannot open %s\n", path);
    return 1;
  }
  size_t cap = 1 << 16, size = 0;
  uint8_t *buf = (uint8_t *)malloc(cap);
  for (;;) {
    if (size == cap) {
      cap *= 2;
      uint8_t *grown = (uint8_t *)realloc(buf, cap);
      if (!grown) abort();
      buf = grown;
    }
    const size_t got = fread(buf + size, 1, cap - size, f);
    if (got == 0) break;
    size += got;
  }
  fclose(f);
  if (getenv("REPLAY_VERBOSE")) fprintf(stderr, "replay: %s (%zu bytes)\n", path, size);
  /* the input is copied to an exact-size heap block so that ASan sees reads past its end */
  uint8_t *exact = (uint8_t *)malloc(size ? size : 1);
  if (size) memcpy(exact, buf, size);
  free(buf);
  LLVMFuzzerTestOneInput(exact, size);
  free(exact);
  return 0;
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv) {
  long inputs = 0;
  int errors = 0;
  for (int a = 1; a < argc; ++a) {
    struct stat st;
    if (stat(argv[a], &st) != 0) {
      fprintf(stderr, "replay: no such file or directory: %s\n", argv[a]);
      errors = 1;
      continue;
    }
    if (!S_ISDIR(st.st_mode)) {
      errors |= run_file(argv[a]);
      ++inputs;
      continue;
    }
    DIR *dir = opendir(argv[a]);
    if (!dir) {
      errors = 1;
      continue;
    }
    /* sorted, so that runs are reproducible */
    size_t n = 0, cap = 64;
    char **names = (char **)malloc(cap * sizeof *names);
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
      if (e->d_name[0] == '.') continue;
      if (n == cap) names = (char **)realloc(names, (cap *= 2) * sizeof *names);
      const size_t len = strlen(argv[a]) + strlen(e->d_name) + 2;
      names[n] = (char *)malloc(len);
      snprintf(names[n], len, "%s/%s", argv[a], e->d_name);
      ++n;
    }
    closedir(dir);
    qsort(names, n, sizeof *names, by_name);
    for (size_t i = 0; i < n; ++i) {
      struct stat fs;
      if (stat(names[i], &fs) == 0 && S_ISREG(fs.st_mode)) {
        errors |= run_file(names[i]);
        ++inputs;
      }
      free(names[i]);
    }
    free(names);
  }
  printf("replay: %ld inputs, %s\n", inputs, errors ? "with errors" : "all passed");
  return errors;
}
