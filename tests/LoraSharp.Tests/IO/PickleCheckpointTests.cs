using System.IO.Compression;
using System.Text;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.IO;

/// <summary>
/// torch.save zip checkpoints built here byte by byte (no Python on this machine). Opcode sequences follow
/// pickle protocol 2 as torch.save emits it: PROTO 2, EMPTY_DICT, MARK, key, GLOBAL torch._utils._rebuild_tensor_v2,
/// MARK, (MARK 'storage' GLOBAL torch.FloatStorage key 'cpu' numel TUPLE) BINPERSID, offset, size, stride, False,
/// OrderedDict() , TUPLE, REDUCE, ..., SETITEMS, STOP.
/// </summary>
public class PickleCheckpointTests
{
    static void Zip(string path, byte[] pickle, params (string Key, byte[] Data)[] storages) =>
        TorchCheckpointWriter.WriteArchive(path, pickle, storages.Select(s => (s.Key, (Action<Stream>)(st => st.Write(s.Data)))));

    static byte[] Floats(int n) => Enumerable.Range(0, n).SelectMany(i => BitConverter.GetBytes((float)i)).ToArray();

    [Theory]
    [InlineData("os", "system")]
    [InlineData("builtins", "eval")]
    [InlineData("posix", "system")]
    [InlineData("subprocess", "Popen")]
    [InlineData("pytorch_lightning", "Trainer")]
    [InlineData("numpy", "load")]
    public void A_global_outside_the_allow_list_is_refused_by_name_before_anything_runs(string module, string name)
    {
        using var dir = new TempDir();
        // GLOBAL module\nname\n, BINUNICODE 'echo pwned', TUPLE1, REDUCE, STOP
        var pickle = new PickleBuilder().Proto(2).Global(module, name).Str("echo pwned").Op(0x85).Reduce().Stop().ToArray();
        var path = dir.File("evil.ckpt");
        Zip(path, pickle);
        var e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(path));
        Assert.Contains($"refused global '{module}.{name}'", e.Message);
        Assert.Equal($"{module}.{name}", e.Key);
        Assert.Equal(path, e.FilePath);
    }

    [Fact]
    public void Stack_global_of_builtins_eval_in_protocol_4_is_refused_by_name()
    {
        // PROTO 4, SHORT_BINUNICODE 'builtins', MEMOIZE, SHORT_BINUNICODE 'eval', MEMOIZE, STACK_GLOBAL, ...
        var b = new List<byte> { 0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0 };
        void Short(string s) { b.Add(0x8c); b.Add((byte)s.Length); b.AddRange(Encoding.ASCII.GetBytes(s)); b.Add(0x94); }
        Short("builtins");
        Short("eval");
        b.Add(0x93);
        Short("__import__('os').system('id')");
        b.AddRange(new byte[] { 0x85, (byte)'R', (byte)'.' });
        var e = Assert.Throws<LoraSharpException>(() => PickleMachine.Load(b.ToArray(), "evil.pt"));
        Assert.Contains("refused global 'builtins.eval'", e.Message);
    }

    /// <summary>
    /// What an original SD 1.x training checkpoint (PyTorch Lightning 1.4, pickle protocol 2) holds besides the weights:
    /// {"epoch", "global_step", "pytorch-lightning_version", "callbacks": {ModelCheckpoint (the class as key): {"monitor":
    /// None, "best_model_score": numpy float64 scalar, "dirpath": ...}}, "trainer": a ModelCheckpoint instance (NEWOBJ +
    /// BUILD), "tags": set(...), "state_dict": {...}}.
    /// </summary>
    static byte[] LightningCheckpointPickle()
    {
        var p = new PickleBuilder().Proto(2);
        p.EmptyDict().Mark();
        p.Str("epoch").Int(6).Str("global_step").Int(470000).Str("pytorch-lightning_version").Str("1.4.2");
        // numpy.core.multiarray.scalar(numpy.dtype('f8', False, True) + BUILD (3, '<', ...), _codecs.encode(0.25 as latin-1 text, 'latin1'))
        var quarter = Encoding.Latin1.GetString(BitConverter.GetBytes(0.25));
        p.Str("callbacks").EmptyDict().Global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint").EmptyDict().Mark()
            .Str("monitor").Op((byte)'N')
            .Str("best_model_score").Global("numpy.core.multiarray", "scalar").Mark()
                .Global("numpy", "dtype").Mark().Str("f8").Op(0x89).Op(0x88).Tuple().Reduce()
                .Mark().Int(3).Str("<").Op((byte)'N').Op((byte)'N').Op((byte)'N').Int(-1).Int(-1).Int(0).Tuple().Op((byte)'b')
                .Global("_codecs", "encode").Mark().Str(quarter).Str("latin1").Tuple().Reduce()
            .Tuple().Reduce()
            .Str("dirpath").Str("logs/2022-08-01/checkpoints")
            .SetItems().SetItem();
        p.Str("trainer").Global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint").EmptyTuple().Op(0x81)
            .EmptyDict().Str("verbose").Op(0x89).SetItem().Op((byte)'b');
        p.Str("tags").Global("__builtin__", "set").Mark().Op((byte)']').Mark().Str("sd").Str("v1").Op((byte)'e').Tuple().Reduce();
        p.Str("state_dict").EmptyDict().Str("model.diffusion_model.w").RebuildTensor("FloatStorage", "0", 4, 0, [2, 2], [2, 1]).SetItem();
        p.SetItems();
        return p.Stop().ToArray();
    }

    [Fact]
    public void Sd_training_checkpoints_with_lightning_callbacks_and_numpy_scalars_load_without_running_anything()
    {
        using var dir = new TempDir();
        var path = dir.File("sd-v1-x.ckpt");
        Zip(path, LightningCheckpointPickle(), ("0", Floats(4)));
        using var ckpt = PickleCheckpoint.Open(path);
        Assert.True(ckpt.Contains("state_dict.model.diffusion_model.w"));
        using (var t = ckpt.Load("state_dict.model.diffusion_model.w"))
            Assert.Equal(new float[] { 0, 1, 2, 3 }, t.data<float>().ToArray());
        Assert.Equal("470000", ckpt.Metadata["global_step"]);
        Assert.Equal("1.4.2", ckpt.Metadata["pytorch-lightning_version"]);
        Assert.Equal("0.25", ckpt.Metadata["callbacks.pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint.best_model_score"]);
        Assert.Equal("v1", ckpt.Metadata["tags.1"]);

        // The Lightning class is data only: calling it is refused, naming it.
        var call = new PickleBuilder().Proto(2).Global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint").Str("x").Op(0x85).Reduce().Stop().ToArray();
        var e = Assert.Throws<LoraSharpException>(() => PickleMachine.Load(call, "evil.ckpt"));
        Assert.Contains("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint cannot be called", e.Message);
        // _codecs.encode only as latin-1 bytes
        var codec = new PickleBuilder().Proto(2).Global("_codecs", "encode").Mark().Str("x").Str("rot13").Tuple().Reduce().Stop().ToArray();
        Assert.Contains("_codecs.encode is only read as (text, 'latin1')", Assert.Throws<LoraSharpException>(() => PickleMachine.Load(codec, "odd.ckpt")).Message);
    }

    /// <summary>One storage of 12 floats 0..11 shared by five tensors: whole, transposed, a row at an offset, a strided 2x2, and a scalar.</summary>
    static byte[] SharedStoragePickle()
    {
        var p = new PickleBuilder().Proto(2);
        p.EmptyDict().Str("state_dict").EmptyDict().Mark();
        p.Str("whole").RebuildTensor("FloatStorage", "0", 12, 0, [3, 4], [4, 1]);
        p.Str("transposed").RebuildTensor("FloatStorage", "0", 12, 0, [4, 3], [1, 4]);
        p.Str("row1").RebuildTensor("FloatStorage", "0", 12, 4, [4], [1]);
        p.Str("strided").RebuildTensor("FloatStorage", "0", 12, 1, [2, 2], [6, 2]);
        p.Str("scalar").RebuildTensor("FloatStorage", "0", 12, 11, [], []);
        // A parameter wrapping a tensor on a second storage, as nn.Module state dicts with Parameters pickle it:
        p.Str("param").Global("torch._utils", "_rebuild_parameter").Mark()
            .RebuildTensor("HalfStorage", "1", 2, 0, [2], [1]).Op(0x88).Global("collections", "OrderedDict").EmptyTuple().Reduce().Tuple().Reduce();
        p.SetItems().SetItem();
        // Non-tensor values become metadata: {"epoch": 3, "lr": 0.5, "name": "run", "hparams": {"rank": 4}}
        p.Mark().Str("epoch").Int(3).Str("lr").Op((byte)'G').Raw([0x3F, 0xE0, 0, 0, 0, 0, 0, 0]).Str("name").Str("run")
            .Str("hparams").EmptyDict().Str("rank").Int(4).SetItem()
            .Str("lst").Op((byte)']').Mark().Str("x").Str("y").Op((byte)'e')
            .SetItems();
        return p.Stop().ToArray();
    }

    [Fact]
    public void Views_with_offsets_and_strides_on_a_shared_storage_load_exactly()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        var path = dir.File("views.ckpt");
        Zip(path, SharedStoragePickle(), ("0", Floats(12)), ("1", [0x00, 0x3C, 0x00, 0xC0])); // fp16 1.0, -2.0
        using var f = TensorFiles.Open(path);
        Assert.IsType<PickleCheckpoint>(f);
        Assert.Equal(["state_dict.whole", "state_dict.transposed", "state_dict.row1", "state_dict.strided", "state_dict.scalar", "state_dict.param"], f.Keys);
        var storage = arange(12, dtype: ScalarType.Float32);
        TensorAssert.BitwiseEqual(storage.reshape(3, 4), f.Load("state_dict.whole"));
        TensorAssert.BitwiseEqual(storage.reshape(3, 4).t().contiguous(), f.Load("state_dict.transposed"));
        TensorAssert.BitwiseEqual(tensor(new float[] { 4, 5, 6, 7 }), f.Load("state_dict.row1"));
        TensorAssert.BitwiseEqual(tensor(new float[] { 1, 3, 7, 9 }).reshape(2, 2), f.Load("state_dict.strided"));
        TensorAssert.BitwiseEqual(tensor(11f), f.Load("state_dict.scalar"));
        Assert.Equal(new[] { 1f, -2f }, f.Load("state_dict.param", ScalarType.Float32).data<float>().ToArray());
        Assert.Equal("F16", f.Info("state_dict.param").DType);
        Assert.Equal(new long[] { 2, 2 }, f.Info("state_dict.strided").Shape);
        Assert.Equal("3", f.Metadata["epoch"]);
        Assert.Equal("0.5", f.Metadata["lr"]);
        Assert.Equal("run", f.Metadata["name"]);
        Assert.Equal("4", f.Metadata["hparams.rank"]);
        Assert.Equal("y", f.Metadata["lst.1"]);
    }

    [Fact]
    public void Compressed_zip_entries_are_inflated_on_load()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        var path = dir.File("deflated.ckpt");
        using (var zip = ZipFile.Open(path, ZipArchiveMode.Create))
        {
            void Entry(string name, byte[] data)
            {
                using var s = zip.CreateEntry(name, CompressionLevel.Optimal).Open();
                s.Write(data);
            }
            Entry("model/data.pkl", SharedStoragePickle());
            Entry("model/data/0", Floats(12));
            Entry("model/data/1", [0x00, 0x3C, 0x00, 0xC0]);
        }
        using var f = PickleCheckpoint.Open(path);
        TensorAssert.BitwiseEqual(tensor(new float[] { 1, 3, 7, 9 }).reshape(2, 2), f.Load("state_dict.strided"));
        TensorAssert.BitwiseEqual(tensor(new float[] { 4, 5, 6, 7 }), f.Load("state_dict.row1"));
    }

    [Fact]
    public void Checkpoint_writer_round_trips_every_dtype_bitwise_with_a_state_dict_wrapper()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        ScalarType[] types = [ScalarType.Float64, ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16, ScalarType.Int64,
            ScalarType.Int32, ScalarType.Int16, ScalarType.Int8, ScalarType.Byte, ScalarType.Bool];
        var tensors = types.Select((dt, i) =>
            new KeyValuePair<string, Tensor>($"layer{i}.{dt}", SafetensorsRoundTripTests.RandomTensor(dt, [2, 3, i + 1], i)))
            .Append(new KeyValuePair<string, Tensor>("empty", zeros(0, 5))).ToList();
        var path = dir.File("w.ckpt");
        TorchCheckpointWriter.Write(path, tensors, wrapKey: "state_dict");
        using (var zip = ZipFile.OpenRead(path)) // storages stored uncompressed, so they are read in place
            Assert.All(zip.Entries, z => Assert.Equal(z.Length, z.CompressedLength));
        using var f = TensorFiles.Open(path);
        Assert.Equal(tensors.Select(t => "state_dict." + t.Key), f.Keys);
        foreach (var (k, t) in tensors)
            TensorAssert.BitwiseEqual(t, f.Load("state_dict." + k), k);
    }

    [Fact]
    public void Broken_checkpoints_give_clear_errors()
    {
        using var dir = new TempDir();
        // A view reaching past its storage.
        var p = new PickleBuilder().Proto(2).EmptyDict().Str("w").RebuildTensor("FloatStorage", "0", 4, 2, [3], [1]).SetItem().Stop().ToArray();
        Zip(dir.File("reach.ckpt"), p, ("0", Floats(4)));
        var e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("reach.ckpt")));
        Assert.Equal("w", e.Key);
        Assert.Contains("reaches element 4 of storage '0' which has 4", e.Message);

        // Storage entry shorter than the storage's declared size.
        p = new PickleBuilder().Proto(2).EmptyDict().Str("w").RebuildTensor("FloatStorage", "0", 4, 0, [4], [1]).SetItem().Stop().ToArray();
        Zip(dir.File("short.ckpt"), p, ("0", Floats(3)));
        e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("short.ckpt")));
        Assert.Contains("truncated", e.Message);

        // Storage entry missing.
        Zip(dir.File("nostorage.ckpt"), p);
        e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("nostorage.ckpt")));
        Assert.Contains("missing from the zip", e.Message);

        // Pickle cut short.
        Zip(dir.File("cut.ckpt"), p[..^10], ("0", Floats(4)));
        e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("cut.ckpt")));
        Assert.Contains("data.pkl", e.Message);

        // A zip without data.pkl.
        using (var zip = ZipFile.Open(dir.File("plain.zip"), ZipArchiveMode.Create))
            using (var s = zip.CreateEntry("readme.txt").Open()) s.Write("hi"u8);
        e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("plain.zip")));
        Assert.Contains("no data.pkl", e.Message);

        // A truncated zip (the end record is gone).
        var good = File.ReadAllBytes(ReferenceData.PathOf("sd", "model", "tiny_sd15.ckpt"));
        File.WriteAllBytes(dir.File("trunc.ckpt"), good[..(good.Length / 2)]);
        e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("trunc.ckpt")));
        Assert.Contains("end-of-central-directory", e.Message);
    }

    [Fact]
    public void Rebuild_from_type_v2_parameters_load_and_deep_nesting_is_refused_without_crashing()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        // {"p": torch._tensor._rebuild_from_type_v2(torch._utils._rebuild_tensor_v2, torch.nn.parameter.Parameter,
        //        (storage, 0, (2,), (1,), False, OrderedDict()), {})}
        var p = new PickleBuilder().Proto(2).EmptyDict().Str("p")
            .Global("torch._tensor", "_rebuild_from_type_v2").Mark()
            .Global("torch._utils", "_rebuild_tensor_v2").Global("torch.nn.parameter", "Parameter")
            .Mark().Mark().Str("storage").Global("torch", "FloatStorage").Str("0").Str("cpu").Int(2).Tuple().BinPersId()
            .Int(0).IntTuple([2]).IntTuple([1]).False().Global("collections", "OrderedDict").EmptyTuple().Reduce().Tuple()
            .EmptyDict().Tuple().Reduce()
            .SetItem().Stop().ToArray();
        Zip(dir.File("param.pt"), p, ("0", Floats(2)));
        using (var f = TensorFiles.Open(dir.File("param.pt")))
            TensorAssert.BitwiseEqual(tensor(new float[] { 0, 1 }), f.Load("p"));

        // 10,000 nested lists: [[[[...]]]] built iteratively by the pickle, refused by the flattener's depth limit.
        var deep = new PickleBuilder().Proto(2);
        for (int i = 0; i < 10_000; i++) deep.Op((byte)']');
        for (int i = 0; i < 9_999; i++) deep.Op((byte)'a');
        Zip(dir.File("deep.pt"), deep.Stop().ToArray());
        var e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("deep.pt")));
        Assert.Contains("nested deeper than", e.Message);
    }
}
