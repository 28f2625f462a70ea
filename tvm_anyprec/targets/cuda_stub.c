/* A stand-in for the CUDA driver library (libcuda.so.1) on machines without an NVIDIA driver.
 *
 * TVM's CUDA runtime sidecar (libtvm_runtime_cuda.so) links against libcuda.so.1; when it cannot be loaded,
 * TVM builds CUDA modules as source only and never runs nvcc. With this stub loaded first the sidecar loads,
 * so `tvm.compile` for a CUDA target runs nvcc and embeds a real fatbin. Every driver call reports
 * CUDA_ERROR_NO_DEVICE (100): nothing can run on it, and a session fails with a clear error.
 * Built by tvm_anyprec.targets.cuda (cc -shared -fPIC -Wl,-soname,libcuda.so.1); never used where a real
 * driver loads. */
#include <stddef.h>

#define NO_DEVICE 100
typedef int CUresult;

static const char *kName = "CUDA_ERROR_NO_DEVICE";
static const char *kText = "no CUDA-capable device (tvm-anyprec's stub libcuda.so.1: no NVIDIA driver here)";

CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; if (s) *s = kName; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; if (s) *s = kText; return 0; }
CUresult cuInit(unsigned int flags) { (void)flags; return NO_DEVICE; }
CUresult cuDriverGetVersion(int *v) { if (v) *v = 0; return NO_DEVICE; }
CUresult cuDeviceGetCount(int *n) { if (n) *n = 0; return NO_DEVICE; }
CUresult cuGetProcAddress(const char *sym, void **p, int ver, unsigned long long flags, void *status) {
  (void)sym; (void)ver; (void)flags; (void)status; if (p) *p = NULL; return NO_DEVICE;
}
CUresult cuGetProcAddress_v2(const char *sym, void **p, int ver, unsigned long long flags, void *status) {
  return cuGetProcAddress(sym, p, ver, flags, status);
}
CUresult cuGetExportTable(const void **table, const void *id) { (void)id; if (table) *table = NULL; return NO_DEVICE; }
/* the symbols libtvm_runtime_cuda.so imports */
CUresult cuDeviceGetName(char *name, int len, int dev) { (void)dev; if (name && len > 0) name[0] = 0; return NO_DEVICE; }
CUresult cuFuncSetAttribute(void *f, int attr, int value) { (void)f; (void)attr; (void)value; return NO_DEVICE; }
CUresult cuLaunchKernelEx(const void *config, void *f, void **params, void **extra) {
  (void)config; (void)f; (void)params; (void)extra; return NO_DEVICE;
}
CUresult cuModuleGetFunction(void **f, void *mod, const char *name) { (void)mod; (void)name; if (f) *f = NULL; return NO_DEVICE; }
CUresult cuModuleLoadData(void **mod, const void *image) { (void)image; if (mod) *mod = NULL; return NO_DEVICE; }
CUresult cuModuleUnload(void *mod) { (void)mod; return NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void *map, int dtype, unsigned rank, void *addr, const void *dims, const void *strides,
                                const void *box, const void *estrides, int interleave, int swizzle, int l2, int oob) {
  (void)map; (void)dtype; (void)rank; (void)addr; (void)dims; (void)strides; (void)box; (void)estrides;
  (void)interleave; (void)swizzle; (void)l2; (void)oob; return NO_DEVICE;
}
