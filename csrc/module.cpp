// Python module init for sslam_fast._C.
//
// The module itself is (almost) empty: importing it loads this shared library, whose static initialisers register
// the C++ ops (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) under torch.ops.sslam_fast_C. Built against the limited API
// (Py_LIMITED_API=0x03090000), so no pybind11.

#include <Python.h>

#ifdef WITH_CUDA
#define SSLAM_FAST_WITH_CUDA 1
#else
#define SSLAM_FAST_WITH_CUDA 0
#endif

static struct PyModuleDef sslam_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                        // m_name
    "Compiled kernels of sslam_fast; importing it registers torch.ops.sslam_fast.*",  // m_doc
    -1,                                                          // m_size
    nullptr,                                                     // m_methods
    nullptr,                                                     // m_slots
    nullptr,                                                     // m_traverse
    nullptr,                                                     // m_clear
    nullptr,                                                     // m_free
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&sslam_fast_c_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "WITH_CUDA", SSLAM_FAST_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
