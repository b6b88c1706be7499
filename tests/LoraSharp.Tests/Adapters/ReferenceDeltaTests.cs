using System.Text.Json.Nodes;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static LoraSharp.Tests.Adapters.TestTrees;

namespace LoraSharp.Tests.Adapters;

/// <summary>ΔW of every module with a reference delta, merged and unmerged, against the deltas the Python tools recorded.</summary>
public class ReferenceDeltaTests
{
    static JsonNode LlmManifest => ReferenceData.ReadJson("llm", "manifest.json");
    static JsonNode SdManifest => ReferenceData.ReadJson("sd", "manifest.json");

    public static TheoryData<string> LlmCases()
    {
        var d = new TheoryData<string>();
        foreach (var a in LlmManifest["adapters"]!.AsArray()) d.Add(a!["name"]!.GetValue<string>());
        return d;
    }

    public static TheoryData<string> SdCases()
    {
        var d = new TheoryData<string>();
        foreach (var a in SdManifest["loras"]!.AsArray()) d.Add(a!["name"]!.GetValue<string>());
        return d;
    }

    public static TheoryData<string> WeightedCases()
    {
        var d = new TheoryData<string>();
        var w = LlmManifest["weighted"]!;
        foreach (var a in w["sources"]!.AsArray().Concat(w["combinations"]!.AsArray())) d.Add(a!["name"]!.GetValue<string>());
        return d;
    }

    static Node LlmTree() => ReferenceTranslator.TreeFromWeights(ReferenceData.PathOf("llm", "model", "model.safetensors"),
        p => p.EndsWith("_proj") || p == "lm_head");

    /// <summary>Checks unmerged outputs and merged weights of every delta module; returns the number of modules checked.</summary>
    static int CheckDeltas(AdapterHost host, Node root, SafetensorsFile refs, string deltaPrefix, Func<string, string> hostPath,
        double atol, double rtol)
    {
        var deltas = refs.Keys.Where(k => k.StartsWith(deltaPrefix)).ToList();
        Assert.NotEmpty(deltas);
        var baseW = new Dictionary<string, Tensor>();
        // unmerged: y(x) − base(x) = F(x, ΔW_ref)
        foreach (var key in deltas)
        {
            var path = hostPath(key[deltaPrefix.Length..^".weight".Length]);
            var leaf = Leaf(root, path);
            var w = leaf is Linear l ? l.weight! : ((Conv2d)leaf).weight!;
            baseW[path] = w.detach().clone();
            var refDelta = refs.Load(key, float32);
            Assert.Equal(w.shape, refDelta.shape);
            var g = LayerGeometry.Of(leaf, path);
            manual_seed(3);
            var x = g.IsConv ? randn(1, g.InFeatures, 6, 6) : randn(3, g.InFeatures);
            var got = leaf.call(x).sub(g.Apply(x, w, leaf is Linear ll ? ll.bias : ((Conv2d)leaf).bias));
            var expect = g.Apply(x, refDelta);
            double scale = Math.Max(1, expect.abs().max().item<float>());
            Assert.True(MaxAbs(got, expect) <= 1e-4 * scale, $"{key}: unmerged output differs by {MaxAbs(got, expect):G3}");
        }
        host.Merge();
        foreach (var key in deltas)
        {
            var path = hostPath(key[deltaPrefix.Length..^".weight".Length]);
            var leaf = Leaf(root, path);
            var w = leaf is Linear l ? l.weight! : ((Conv2d)leaf).weight!;
            var ours = w.detach().sub(baseW[path]);
            var refDelta = refs.Load(key, float32);
            var excess = ours.sub(refDelta).abs().sub(refDelta.abs().mul(rtol)).max().item<float>();
            Assert.True(excess <= atol, $"{key}: merged ΔW differs by {MaxAbs(ours, refDelta):G3} (atol {atol}, rtol {rtol})");
        }
        host.Unmerge();
        foreach (var (path, w0) in baseW)
        {
            var leaf = Leaf(root, path);
            Assert.True(Same(leaf is Linear l ? l.weight! : ((Conv2d)leaf).weight!, w0), $"{path} not restored");
        }
        return deltas.Count;
    }

    [Theory]
    [MemberData(nameof(LlmCases))]
    public void Peft_llm_adapter_reproduces_reference_deltas(string name)
    {
        using var scope = NewDisposeScope();
        var entry = LlmManifest["adapters"]!.AsArray().First(a => a!["name"]!.GetValue<string>() == name)!;
        double atol = LlmManifest["tolerances"]!["delta_atol"]!.GetValue<double>();
        var root = LlmTree();
        using var host = new AdapterHost(root);
        using var weights = ReferenceTranslator.ReadPeft(ReferenceData.PathOf("llm", entry["dir"]!.GetValue<string>()), name);
        var attached = host.Attach(weights);
        Assert.Equal(weights.Modules.Count, attached.Report.Attached.Count);
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("llm", entry["vectors"]!.GetValue<string>()));
        int n = CheckDeltas(host, root, refs, entry["keys"]!["delta_prefix"]!.GetValue<string>(), p => p, atol, 0);
        Assert.True(n >= 2);
    }

    [Theory]
    [MemberData(nameof(SdCases))]
    public void Sd_adapter_file_reproduces_reference_deltas(string name)
    {
        using var scope = NewDisposeScope();
        var m = SdManifest;
        var entry = m["loras"]!.AsArray().First(a => a!["name"]!.GetValue<string>() == name)!;
        var tol = m["tolerances"]![entry["tolerance_delta"]!.GetValue<string>()]!;
        var root = SdReferenceTree();
        using var host = new AdapterHost(root);
        string file = ReferenceData.PathOf("sd", entry["file"]!.GetValue<string>());
        string layout = entry["layout"]!.GetValue<string>();
        IEnumerable<string> Adaptable(string component) => root.named_modules()
            .Where(x => x.module is Linear or Conv2d && x.name.StartsWith(component + ".", StringComparison.Ordinal))
            .Select(x => x.name[(component.Length + 1)..]);
        using var weights = layout == "diffusers"
            ? ReferenceTranslator.ReadDiffusers(file, name)
            : ReferenceTranslator.ReadKohya(file, name, Adaptable("unet"), Adaptable("text_encoder"));
        var attached = host.Attach(weights);
        Assert.Equal(entry["n_base_weights_changed"]!.GetValue<int>(), attached.Report.Attached.Count);
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("sd", entry["ref_file"]!.GetValue<string>()));
        string prefix = entry["delta"]!["prefix"]!.GetValue<string>();
        int n = CheckDeltas(host, root, refs, prefix,
            p => p.StartsWith("te.") ? "text_encoder." + p[3..] : p.StartsWith("unet.") ? p : throw new InvalidDataException(p),
            tol["atol"]!.GetValue<double>(), tol["rtol"]!.GetValue<double>());
        Assert.Equal(entry["delta"]!["keys"]!.AsArray().Count, n);
    }

    /// <summary>A LLaMA-block-shaped forward over the reference model's Linears (no attention softmax: only the Linears matter here).</summary>
    static Tensor LlmForward(Node root, Tensor x)
    {
        Tensor L(string p, Tensor t) => Leaf(root, p).call(t);
        for (int i = 0; i < 2; i++)
        {
            string a = $"model.layers.{i}.self_attn.", mlp = $"model.layers.{i}.mlp.";
            var q = L(a + "q_proj", x);
            var kv = L(a + "k_proj", x).mul(sigmoid(L(a + "v_proj", x)));
            var att = L(a + "o_proj", q.mul(tanh(cat([kv, kv], -1))));
            var h = x.add(att);
            x = h.add(L(mlp + "down_proj", nn.functional.silu(L(mlp + "gate_proj", h)).mul(L(mlp + "up_proj", h))));
        }
        return L("lm_head", x);
    }

    [Theory]
    [MemberData(nameof(LlmCases))]
    public void Llm_adapted_forward_merged_equals_unmerged_at_several_multipliers(string name)
    {
        using var scope = NewDisposeScope();
        var entry = LlmManifest["adapters"]!.AsArray().First(a => a!["name"]!.GetValue<string>() == name)!;
        var root = LlmTree();
        manual_seed(9);
        var x = randn(2, 8, 64);
        var baseOut = LlmForward(root, x).detach();
        using var host = new AdapterHost(root);
        using var weights = ReferenceTranslator.ReadPeft(ReferenceData.PathOf("llm", entry["dir"]!.GetValue<string>()), name);
        var a = host.Attach(weights);
        foreach (var mult in new[] { 1.0, 0.5, 0.0 })
        {
            a.Multiplier = mult;
            var unmerged = LlmForward(root, x).detach();
            host.Merge();
            var merged = LlmForward(root, x).detach();
            host.Unmerge();
            Assert.True(MaxAbs(merged, unmerged) < 1e-4, $"m={mult}: merged vs unmerged {MaxAbs(merged, unmerged):G3}");
            if (mult == 0) Assert.True(MaxAbs(unmerged, baseOut) == 0);
            else Assert.True(MaxAbs(unmerged, baseOut) > 1e-3);
        }
        // one module: a linear algorithm's contribution is proportional to m (DoRA's is not, by design)
        var q = Leaf(root, "model.layers.0.self_attn.q_proj");
        var xi = randn(4, 64);
        a.Multiplier = 0; var y0 = q.call(xi).detach();
        a.Multiplier = 1; var y1 = q.call(xi).detach();
        a.Multiplier = 0.5; var yh = q.call(xi).detach();
        if (name != "dora") Assert.True(MaxAbs(yh, y0.add(y1.sub(y0).mul(0.5))) < 1e-5);
    }

    [Theory]
    [MemberData(nameof(WeightedCases))]
    public void Peft_weighted_adapter_sources_and_combinations_reproduce_reference_deltas(string name)
    {
        using var scope = NewDisposeScope();
        var w = LlmManifest["weighted"]!;
        var entry = w["sources"]!.AsArray().Concat(w["combinations"]!.AsArray()).First(a => a!["name"]!.GetValue<string>() == name)!;
        var root = LlmTree();
        using var host = new AdapterHost(root);
        using var weights = ReferenceTranslator.ReadPeft(ReferenceData.PathOf("llm", entry["dir"]!.GetValue<string>()), name);
        host.Attach(weights);
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("llm", w["vectors"]!.GetValue<string>()));
        CheckDeltas(host, root, refs, $"delta.{name}.", p => p, LlmManifest["tolerances"]!["delta_atol"]!.GetValue<double>(), 0);
    }

    [Fact]
    public void Two_adapters_with_multipliers_merge_to_the_peft_cat_combination()
    {
        // PEFT's "cat" combination of a1, a2 with weights [0.7, 0.4] has ΔW = 0.7·ΔW_a1 + 0.4·ΔW_a2 exactly.
        using var scope = NewDisposeScope();
        var w = LlmManifest["weighted"]!;
        var weightsList = w["weights"]!.AsArray().Select(x => x!.GetValue<double>()).ToArray();
        var root = LlmTree();
        using var host = new AdapterHost(root);
        var sources = w["sources"]!.AsArray().Select(a => a!).ToArray();
        for (int i = 0; i < sources.Length; i++)
        {
            using var aw = ReferenceTranslator.ReadPeft(ReferenceData.PathOf("llm", sources[i]["dir"]!.GetValue<string>()), sources[i]["name"]!.GetValue<string>());
            host.Attach(aw, multiplier: weightsList[i]);
        }
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("llm", w["vectors"]!.GetValue<string>()));
        int n = CheckDeltas(host, root, refs, "delta.cat.", p => p, LlmManifest["tolerances"]!["delta_atol"]!.GetValue<double>(), 0);
        Assert.Equal(7, n);
    }

    // ---- the same references through the Formats readers (the contract between the two areas) ----

    [Theory]
    [MemberData(nameof(LlmCases))]
    public void Formats_reader_and_adapter_host_reproduce_llm_reference_deltas(string name)
    {
        using var scope = NewDisposeScope();
        var entry = LlmManifest["adapters"]!.AsArray().First(a => a!["name"]!.GetValue<string>() == name)!;
        var root = LlmTree();
        using var host = new AdapterHost(root);
        using var read = AdapterFile.Read(ReferenceData.PathOf("llm", entry["dir"]!.GetValue<string>()), ModuleIndex.FromModule(root));
        var attached = host.Attach(read.Weights);
        Assert.Equal(read.Weights.Modules.Count, attached.Report.Attached.Count);
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("llm", entry["vectors"]!.GetValue<string>()));
        CheckDeltas(host, root, refs, entry["keys"]!["delta_prefix"]!.GetValue<string>(), p => p,
            LlmManifest["tolerances"]!["delta_atol"]!.GetValue<double>(), 0);
    }

    [Theory]
    [MemberData(nameof(SdCases))]
    public void Formats_reader_and_adapter_host_reproduce_sd_reference_deltas(string name)
    {
        using var scope = NewDisposeScope();
        var m = SdManifest;
        var entry = m["loras"]!.AsArray().First(a => a!["name"]!.GetValue<string>() == name)!;
        var tol = m["tolerances"]![entry["tolerance_delta"]!.GetValue<string>()]!;
        var root = SdReferenceTree();
        using var host = new AdapterHost(root);
        using var read = AdapterFile.Read(ReferenceData.PathOf("sd", entry["file"]!.GetValue<string>()), ModuleIndex.FromModule(root));
        var attached = host.Attach(read.Weights);
        Assert.Equal(entry["n_base_weights_changed"]!.GetValue<int>(), attached.Report.Attached.Count);
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("sd", entry["ref_file"]!.GetValue<string>()));
        CheckDeltas(host, root, refs, entry["delta"]!["prefix"]!.GetValue<string>(),
            p => p.StartsWith("te.") ? "text_encoder." + p[3..] : p, tol["atol"]!.GetValue<double>(), tol["rtol"]!.GetValue<double>());
    }

    /// <summary>The reference SD model's UNet and text encoder (no embeddings) as one module tree of plain Linear / Conv2d leaves.</summary>
    static Node SdReferenceTree()
    {
        var unet = ReferenceTranslator.TreeFromWeights(ReferenceData.PathOf("sd", "model", "diffusers", "unet", "diffusion_pytorch_model.safetensors"));
        var te = ReferenceTranslator.TreeFromWeights(ReferenceData.PathOf("sd", "model", "diffusers", "text_encoder", "model.safetensors"),
            p => !p.Contains("embeddings."));
        return Build([("unet", unet), ("text_encoder", te)]);
    }
}
