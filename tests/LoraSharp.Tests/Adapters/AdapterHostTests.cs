using LoraSharp.Adapters;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static LoraSharp.Tests.Adapters.TestTrees;

namespace LoraSharp.Tests.Adapters;

public class AdapterHostTests
{
    /// <summary>A two-block tree: text_encoder.{q,v} Linear 8→8, unet.conv Conv2d 3×3 4→6, unet.proj Conv2d 1×1 6→6 (with bias).</summary>
    static Node Tree(ScalarType dtype = ScalarType.Float32)
    {
        manual_seed(11);
        var root = Build([
            ("text_encoder.q", nn.Linear(8, 8, hasBias: true, dtype: dtype)),
            ("text_encoder.v", nn.Linear(8, 8, hasBias: false, dtype: dtype)),
            ("unet.conv", nn.Conv2d(4, 6, 3, stride: 1, padding: 1, dtype: dtype)),
            ("unet.proj", nn.Conv2d(6, 6, 1, dtype: dtype)),
            ("unet.norm", nn.LayerNorm(6, dtype: dtype)),
        ]);
        return root;
    }

    static Tensor TeForward(Node root, Tensor x) => Leaf(root, "text_encoder.v").call(Leaf(root, "text_encoder.q").call(x));
    static Tensor UnetForward(Node root, Tensor x) => Leaf(root, "unet.proj").call(Leaf(root, "unet.conv").call(x));

    static AdapterWeights RandomLora(string name, double scaleOfUp = 0.5, long seed = 21)
    {
        manual_seed(seed);
        return new AdapterWeights
        {
            Name = name,
            Modules =
            [
                new() { ModulePath = "text_encoder.q", Algorithm = AdapterAlgorithm.LoRA, Alpha = 1,
                    Tensors = new Dictionary<string, Tensor> { ["lora_down"] = randn(2, 8), ["lora_up"] = randn(8, 2).mul(scaleOfUp) } },
                new() { ModulePath = "text_encoder.v", Algorithm = AdapterAlgorithm.LoHa, Alpha = 2,
                    Tensors = new Dictionary<string, Tensor> { ["hada_w1_a"] = randn(8, 2), ["hada_w1_b"] = randn(2, 8), ["hada_w2_a"] = randn(8, 2).mul(scaleOfUp), ["hada_w2_b"] = randn(2, 8) } },
                new() { ModulePath = "unet.conv", Algorithm = AdapterAlgorithm.LoRA, Alpha = 3,
                    Tensors = new Dictionary<string, Tensor> { ["lora_down"] = randn(3, 4, 3, 3), ["lora_up"] = randn(6, 3, 1, 1).mul(scaleOfUp) } },
                new() { ModulePath = "unet.proj", Algorithm = AdapterAlgorithm.Full,
                    Tensors = new Dictionary<string, Tensor> { ["diff"] = randn(6, 6, 1, 1).mul(0.1), ["diff_b"] = randn(6).mul(0.1) } },
            ],
        };
    }

    [Fact]
    public void Hooks_add_adapter_output_and_merged_forward_matches_unmerged()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        var x = randn(2, 5, 8);
        var xi = randn(2, 4, 7, 7);
        var baseTe = TeForward(root, x).detach();
        var baseUnet = UnetForward(root, xi).detach();
        using var host = new AdapterHost(root);
        using var w = RandomLora("a");
        var a = host.Attach(w);
        Assert.Equal(4, a.Report.Attached.Count);
        Assert.Empty(a.Report.Unmatched);
        var te = TeForward(root, x);
        var un = UnetForward(root, xi);
        Assert.True(MaxAbs(te, baseTe) > 1e-2, "adapter changed nothing: hooks did not run");
        host.Merge();
        Assert.Equal(AdapterMode.Merged, host.Mode);
        Assert.True(MaxAbs(TeForward(root, x), te) < 1e-5);
        Assert.True(MaxAbs(UnetForward(root, xi), un) < 1e-5);
        host.Unmerge();
        Assert.True(MaxAbs(TeForward(root, x), te) < 1e-6);
        host.Detach("a");
        Assert.True(MaxAbs(TeForward(root, x), baseTe) == 0);
        Assert.True(MaxAbs(UnetForward(root, xi), baseUnet) == 0);
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float16)]
    public void Unmerge_restores_weights_bit_exactly(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var root = Tree(dtype);
        var before = root.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        using var host = new AdapterHost(root);
        using var w = RandomLora("a");
        host.Attach(w);
        host.Merge();
        Assert.Contains(root.named_parameters(), p => !Same(p.parameter, before[p.name]));
        host["a"].Multiplier = 0.37;
        host.ApplyPending();
        host.Unmerge();
        foreach (var (name, p) in root.named_parameters())
            Assert.True(Same(p, before[name]), $"{name} not restored exactly");
    }

    [Fact]
    public void Multipliers_scale_the_adapter_contribution_linearly_in_both_modes()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        var x = randn(3, 8);
        var q = Leaf(root, "text_encoder.q");
        var y0 = q.call(x).detach();
        using var host = new AdapterHost(root);
        using var w = RandomLora("a");
        var a = host.Attach(w, multiplier: 1);
        var y1 = q.call(x).detach();
        foreach (var mode in new[] { AdapterMode.Unmerged, AdapterMode.Merged })
        {
            if (mode == AdapterMode.Merged) host.Merge();
            foreach (var m in new[] { 0.0, 0.5, 1.0, -0.7 })
            {
                a.Multiplier = m;
                var y = q.call(x);
                Assert.True(MaxAbs(y, y0.add(y1.sub(y0).mul(m))) < 1e-5, $"{mode} m={m}");
            }
        }
    }

    [Fact]
    public void Several_adapters_add_and_can_be_disabled_and_split_by_component()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        var x = randn(3, 8);
        var xi = randn(1, 4, 5, 5);
        var q = Leaf(root, "text_encoder.q");
        var conv = Leaf(root, "unet.conv");
        var (q0, c0) = (q.call(x).detach(), conv.call(xi).detach());
        using var host = new AdapterHost(root);
        using var wa = RandomLora("a", seed: 1);
        using var wb = RandomLora("b", seed: 2);
        var a = host.Attach(wa);
        var (qa, ca) = (q.call(x).detach(), conv.call(xi).detach());
        a.Enabled = false;
        var b = host.Attach(wb, multiplier: 0.5);
        var (qb, cb) = (q.call(x).detach(), conv.call(xi).detach());
        a.Enabled = true;
        foreach (var merged in new[] { false, true })
        {
            if (merged) host.Merge();
            a.SetComponentMultipliers(textEncoder: 0.25, unet: 2);
            b.Multiplier = 0.5;
            Assert.True(MaxAbs(q.call(x), q0.add(qa.sub(q0).mul(0.25)).add(qb.sub(q0))) < 1e-5);
            Assert.True(MaxAbs(conv.call(xi), c0.add(ca.sub(c0).mul(2)).add(cb.sub(c0))) < 1e-4);
            Assert.Equal(0.25, a.MultiplierFor("text_encoder_2.x"));
            Assert.Equal(1.0, a.MultiplierFor("vae.x"));
            // per-module weight (LoRA Block Weight style)
            a.ComponentMultipliers = null;
            a.ModuleWeight = p => p == "unet.conv" ? 0 : 1;
            Assert.True(MaxAbs(conv.call(xi), c0.add(cb.sub(c0))) < 1e-5);
            Assert.True(MaxAbs(q.call(x), qa.add(qb.sub(q0))) < 1e-5);
            a.ModuleWeight = null;
            b.Enabled = false;
            Assert.True(MaxAbs(q.call(x), qa) < 1e-5);
            b.Enabled = true;
        }
    }

    [Fact]
    public void Merged_mode_recomputes_only_on_change_and_uses_cached_deltas()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        var q = (Linear)Leaf(root, "text_encoder.q");
        using var host = new AdapterHost(root);
        using var w = RandomLora("a");
        var a = host.Attach(w);
        host.Merge();
        var merged1 = q.weight!.detach().clone();
        // changing the adapter's parameter without invalidating: the cached ΔW is used
        using (no_grad()) ((LoraAdapter)a.Modules.First(m => m.ModulePath == "text_encoder.q")).Up.mul_(2);
        a.Multiplier = 1; // marks dirty, same value
        host.ApplyPending();
        Assert.True(Same(q.weight!, merged1));
        host.InvalidateCache("a");
        host.ApplyPending();
        Assert.False(Same(q.weight!, merged1));
        var merged2 = q.weight!.detach().clone();
        // without the cache, every re-merge sees the current parameters
        host.CacheDeltas = false;
        using (no_grad()) ((LoraAdapter)a.Modules.First(m => m.ModulePath == "text_encoder.q")).Up.mul_(0.5);
        a.Multiplier = 1;
        host.ApplyPending();
        Assert.True(MaxAbs(q.weight!, merged1) < 1e-6);
        Assert.False(Same(q.weight!, merged2));
    }

    [Fact]
    public void Unknown_module_path_throws_with_close_matches_or_is_reported_when_lenient()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        using var host = new AdapterHost(root);
        var w = new AdapterWeights
        {
            Name = "bad",
            Modules = [new() { ModulePath = "text_encoder.q_proj", Algorithm = AdapterAlgorithm.LoRA,
                Tensors = new Dictionary<string, Tensor> { ["lora_down"] = randn(2, 8), ["lora_up"] = randn(8, 2) } }],
        };
        var e = Assert.Throws<LoraSharpException>(() => host.Attach(w));
        Assert.Contains("text_encoder.q_proj", e.Message);
        Assert.Contains("text_encoder.q", e.Message.Split("Closest:")[1]);
        var a = host.Attach(w, options: new AttachOptions { Lenient = true });
        Assert.Single(a.Report.Unmatched);
        Assert.Empty(a.Report.Attached);
        Assert.Equal(4, a.Report.Untouched.Count);
        Assert.Contains("text_encoder.q", a.Report.Unmatched[0].ClosestMatches);

        var norm = new AdapterWeights
        {
            Name = "norm",
            Modules = [new() { ModulePath = "unet.norm", Algorithm = AdapterAlgorithm.Full, Tensors = new Dictionary<string, Tensor> { ["diff"] = randn(6) } }],
        };
        var en = Assert.Throws<LoraSharpException>(() => host.Attach(norm));
        Assert.Contains("LayerNorm", en.Message);
        Assert.Contains("LayerNorm", host.Attach(norm, options: new AttachOptions { Lenient = true }).Report.Unmatched[0].Reason);
    }

    [Fact]
    public void Selector_matches_exact_suffix_glob_regex_with_excludes()
    {
        string[] paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"];
        string[] Sel(ModuleSelector s) => paths.Where(s.Matches).ToArray();
        Assert.Equal(["model.layers.0.self_attn.q_proj"], Sel(ModuleSelector.Exact("model.layers.0.self_attn.q_proj")));
        Assert.Equal(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"], Sel(ModuleSelector.Suffix("q_proj")));
        Assert.Empty(Sel(ModuleSelector.Suffix("proj")));
        Assert.Equal(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"], Sel(ModuleSelector.Glob("model.layers.0.self_attn.*")));
        Assert.Equal(["model.layers.1.self_attn.q_proj"], Sel(ModuleSelector.Regex(@".*\.1\..*")));
        Assert.Equal(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"],
            Sel(ModuleSelector.All().ExcludeExact("lm_head")));
        Assert.Equal(["model.layers.0.self_attn.k_proj"], Sel(ModuleSelector.Suffix("q_proj", "k_proj").ExcludeGlob("*q_proj")));
    }

    [Fact]
    public void Create_freezes_nothing_by_itself_and_optimizer_gets_only_adapter_parameters()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        using var host = new AdapterHost(root);
        var a = host.Create("train", new AdapterConfig { Rank = 2, Alpha = 4 }, ModuleSelector.Suffix("q", "v", "conv"));
        Assert.Equal(["text_encoder.q", "text_encoder.v", "unet.conv"], a.Report.Attached);
        host.FreezeBase();
        var trainable = host.TrainableParameters();
        Assert.Equal(6, trainable.Count);
        var baseParams = root.parameters().ToList();
        Assert.DoesNotContain(trainable, p => baseParams.Any(b => ReferenceEquals(b, p) || b.Handle == p.Handle));
        Assert.All(baseParams, p => Assert.False(p.requires_grad));
        // a fresh LoRA (up = 0) does not change the output
        var x = randn(3, 8);
        var q = Leaf(root, "text_encoder.q");
        host["train"].Enabled = false;
        var y0 = q.call(x).detach();
        host["train"].Enabled = true;
        Assert.True(MaxAbs(q.call(x), y0) == 0);
        // one training step moves only adapter parameters
        var opt = optim.AdamW(trainable, 1e-2);
        var loss = TeForward(root, x).square().sum().add(UnetForward(root, randn(1, 4, 5, 5)).square().sum());
        loss.backward();
        Assert.All(baseParams, p => Assert.True(p.grad is null));
        Assert.All(trainable, p => Assert.NotNull(p.grad));
        opt.step();
        Assert.True(MaxAbs(q.call(x), y0) > 0);
    }

    [Fact]
    public void Export_round_trips_through_attach()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        var x = randn(3, 8);
        var q = Leaf(root, "text_encoder.q");
        using var host = new AdapterHost(root);
        using var w = RandomLora("a");
        host.Attach(w);
        var y = q.call(x).detach();
        using var exported = host["a"].Export();
        host.Detach("a");
        host.Attach(exported, "again");
        Assert.True(MaxAbs(q.call(x), y) < 1e-6);
    }

    [Fact]
    public void Adapters_created_inside_a_dispose_scope_outlive_it()
    {
        var root = Tree();
        using var host = new AdapterHost(root);
        using (NewDisposeScope())
        {
            using var w = RandomLora("a");
            host.Attach(w);
            host.Create("new", new AdapterConfig { Rank = 2, Dora = DoraKind.Peft }, ModuleSelector.Exact("text_encoder.v"));
        }
        using var scope = NewDisposeScope();
        Assert.All(host.TrainableParameters(), p => Assert.False(p.IsInvalid));
        Assert.All(host["a"].Modules.SelectMany(m => m.Parameters), p => Assert.False(p.Param.IsInvalid));
        var y = TeForward(root, randn(2, 8));
        Assert.Equal(new long[] { 2, 8 }, y.shape);
    }

    [Fact]
    public void Modules_invoked_with_forward_instead_of_call_are_reported()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        var x = randn(2, 8);
        var missing = AdapterHost.ModulesNotCalled(root, () => Leaf(root, "text_encoder.v").forward(Leaf(root, "text_encoder.q").call(x)));
        Assert.Equal(["text_encoder.v", "unet.conv", "unet.proj"], missing);
        // hooks are gone afterwards
        using var host = new AdapterHost(root);
        Assert.Empty(AdapterHost.ModulesNotCalled(root, () => { TeForward(root, x); UnetForward(root, randn(1, 4, 5, 5)); }));
    }

    [Fact]
    public void Path_prefix_maps_component_weights_onto_a_larger_tree()
    {
        using var scope = NewDisposeScope();
        var root = Tree();
        using var host = new AdapterHost(root);
        manual_seed(3);
        using var w = new AdapterWeights
        {
            Name = "te_only",
            Modules = [new() { ModulePath = "q", Algorithm = AdapterAlgorithm.LoRA, Alpha = 2,
                Tensors = new Dictionary<string, Tensor> { ["lora_down"] = randn(2, 8), ["lora_up"] = randn(8, 2) } }],
        };
        var a = host.Attach(w, options: new AttachOptions { PathPrefix = "text_encoder." });
        Assert.Equal(["text_encoder.q"], a.Report.Attached);
        using var back = a.Export(stripPrefix: "text_encoder.");
        Assert.Equal("q", back.Modules.Single().ModulePath);
        Assert.Equal(2, back.Modules.Single().Alpha);
        var e = Assert.Throws<ArgumentException>(() => host.Attach(w, "te_only"));
        Assert.Contains("already attached", e.Message);
    }
}
